
m*
tBYTES:ÿÿÿÿabcd