"""The PII engine: recognizers compiled once, then ``scan`` and ``mask`` per text.

A scan normalizes the text (:mod:`privacy.pii.normalize`), runs up to three RE2 sets over the
detection copy to learn which rules can match at all, runs only those rules, and maps
every accepted span back to the original text. Overlapping detections are merged into
one span (the union, so every character any rule flagged is replaced) typed by
:data:`~privacy.pii.recognizers.PRIORITY`.

Nothing returned by the engine holds a detected value: a :class:`Detection` is a type
and two offsets, and counts are per type. Values exist only inside :meth:`mask`.
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from privacy.pii.normalize import Normalized, decode_references, normalize
from privacy.pii.operators import Operator, Replace
from privacy.pii.recognizers import (
    DEFAULT_ENTITIES,
    EMAIL,
    ENTITIES,
    PHONE,
    PRIORITY,
    RULES,
    SECRET,
    VIEW_SHAPE,
    Rule,
    _calling_codes,
    phone_strong,
    phone_strong_within,
)
from privacy.pii.regex import MAX_SET_PROGRAM_SIZE, Pattern, PatternSet

_RANK: Final = {entity: rank for rank, entity in enumerate(PRIORITY)}
# Separator that keeps tensor elements apart in the per-element scan: no recognizer
# continues an entity across a line break, except multi-line secrets (which must be
# masked across elements anyway).
ELEMENT_BARRIER: Final = "\n"
DEFAULT_JOINS: Final = ("", " ")
_FALLBACK: Final = Replace()


@dataclass(frozen=True, slots=True)
class Detection:
    """An entity's type and where it is; deliberately not its value."""

    entity: str
    start: int
    end: int


# A stretch of a scan still to search: position, end, the list its readings go to, and
# the byte span whose digits it is searched for (None: searched whatever).
_Window = tuple[int, int, list[tuple[str, int, int]], tuple[int, int] | None]


class _Piece(NamedTuple):
    """A tuple, not a frozen dataclass: built per detection on the hot path, where a
    frozen dataclass's ``__init__`` cost more than rendering the piece."""

    start: int
    end: int
    entity: str
    partial: bool  # a piece of an entity that continues in another element


class PiiEngine:
    """Recognizers for a set of entity types, compiled once and shared (thread-safe)."""

    __slots__ = ("_patterns", "_rank", "_rules", "_sets", "entities")

    def __init__(self, entities: Iterable[str] = DEFAULT_ENTITIES) -> None:
        chosen = frozenset(entities)
        unknown = chosen - ENTITIES
        if unknown:
            raise ValueError(f"unknown PII entity types: {sorted(unknown)}; known: {sorted(ENTITIES)}")
        self.entities = chosen
        self._rules: tuple[Rule, ...] = tuple(rule for rule in RULES if rule.entity in chosen)
        self._patterns: tuple[Pattern, ...] = tuple(Pattern(rule.source) for rule in self._rules)
        self._sets = tuple(
            (PatternSet(self._rules[i].source for i in group), group)
            for group in _set_groups(self._rules) if group
        )
        # Glued readings run after every other rule (SECURITY: see ``Rule.glued``).
        self._rank: tuple[int, ...] = tuple(
            _RANK[rule.entity] + (len(_RANK) if rule.glued else 0) for rule in self._rules
        )
        if PHONE in chosen:
            _calling_codes()  # load libphonenumber's table now, not on the first request
        if sum(p.program_size for p in self._patterns) > MAX_SET_PROGRAM_SIZE:
            raise ValueError("PII patterns too large for one RE2 set")

    # --- detection --------------------------------------------------------------------

    def scan(self, text: str) -> list[Detection]:
        """Non-overlapping detections in ``text``, in order, offsets into ``text``."""
        return [Detection(*found) for found in _merge_spans(self._spans(text))]

    def _readings(self, text: str) -> list[Detection]:
        """Every accepted reading, before overlapping ones are merged (may overlap)."""
        return [Detection(*found) for found in self._spans(text)]

    def _spans(self, text: str) -> list[tuple[str, int, int]]:
        """:meth:`_readings` as (entity, start, end) tuples: what :meth:`mask` works on,
        without a frozen :class:`Detection` per reading (its ``__init__`` cost as much as
        a check)."""
        if not self._rules or not text:
            return []
        normalized = normalize(text)
        found = self._scan_copy(normalized)
        if normalized.reordered:
            # SECURITY: a right-to-left override shows one order and feeds a program the
            # other; the model reads logical order, the client's screen display order.
            found.extend(self._scan_copy(normalize(text, display_order=False)))
        decoded = decode_references(text)
        if decoded is not None:
            # SECURITY: "john.doe&#64;example&#46;com" is an address to whoever decodes it.
            found.extend(self._scan_copy(decoded))
        return found

    def _scan_copy(self, normalized: Normalized) -> list[tuple[str, int, int]]:
        data = normalized.text.encode("utf-8")
        hits = [group[i] for pattern_set, group in self._sets for i in pattern_set.matching(data)]
        if not hits:
            return []
        hits.sort()  # rules of one type run in rule order, as with one set
        size = len(data)
        # Past the last digit, a rule whose matches all hold one cannot match.
        views: dict[bytes | None, bytes] = {None: data}  # for ``Rule.required``, made when first asked
        digits_end = _digits_end(data, views)
        accepted: list[tuple[str, int, int]] = []  # entity and byte span
        extra: list[tuple[str, int, int]] = []  # readings that share a phone's groups (below)
        # Stronger types first. A candidate lying wholly inside what they already found
        # cannot change the merged result (a union typed by priority), so its check is
        # skipped: a card's digits need no phone parsing.
        covered: _Covered | None = None
        for index in sorted(hits, key=self._rank.__getitem__):
            rule = self._rules[index]
            search, check, group, entity = self._patterns[index].spans, rule.check, rule.group, rule.entity
            # A candidate is skipped inside what this type and stronger ones found, and
            # searched on after what stronger ones found (and earlier rules of its type). A
            # glued reading runs last, after weaker types too: "call 430-25-4789-227-41-1610"
            # has a phone that ends inside the second SSN, and "call 114-25-7482-600 614
            # 2265" a phone (read with the keyword) that holds the SSN and ends inside the
            # second phone; skipping or searching on from them left that SSN, that phone in
            # clear.
            skip = stronger = covered
            pending = rule.glued and covered is not None  # the two are built on a first candidate
            before = len(accepted)
            coverage: _Coverage | None = None  # built on the first re-read window of this rule
            # (position, end, where readings go, digits it is searched for) still to search
            windows: list[_Window] = []
            if rule.after_entity:
                accepted += _read_after_entities(self._patterns[index], rule, data, accepted)
            else:
                windows.append((0, size, accepted, None))
            limit = digits_end - 1 if rule.needs_digit else size
            if rule.required:
                last = self._last_literal(index, data, views)
                if last < limit:
                    limit = last
            while windows:
                position, end, sink, tail = windows.pop()
                if tail is not None:
                    if coverage is None:
                        coverage = _Coverage(covered, (accepted, before), (extra, 0))
                    if not _uncovered_digit(data, coverage, *tail):
                        continue  # what the reading left of its candidate was masked since
                stop = end if end < limit else limit  # (builtin min and max cost a call each)
                while position <= stop:
                    spans = search(data, position, end)
                    match_start = spans[0][0]
                    if match_start < 0:
                        break
                    if group >= 0:
                        group_start, group_end = spans[group]
                    else:
                        group_start, group_end = next((span for span in spans[1:] if span[0] >= 0), (-1, -1))
                    if pending:
                        skip, stronger = _glued_cover(accepted, entity)
                        pending = False
                    if group_start < 0 or (skip is not None and skip.contains((group_start, group_end))):
                        position = group_end if group_end > match_start else match_start + 1
                        continue
                    inside = stronger.end_of(group_start) if stronger is not None else None
                    if inside is not None:
                        shared = _last_word(data, group_start, inside)
                        if group_start < shared < inside:
                            # The candidate starts earlier in the stronger entity: search again
                            # from the entity's last word, which may be this entity's first group.
                            position = shared - 1 if shared - 1 > match_start else match_start + 1
                            continue
                        if shared != group_start:
                            # SECURITY: a candidate starting inside a stronger entity ("078-05-1120
                            # 415-555-0132") is searched again from that entity's end; judged as one
                            # long number, the phone after the SSN was never masked (found by
                            # security_tests/fuzz).
                            position = inside if inside > match_start else match_start + 1
                            continue
                        # SECURITY: the stronger entity took in this candidate's first group
                        # ("4111 1111 1111 1111 415 555 2671" has a 19-digit card reading): the
                        # candidate is judged anyway, the union masks both, and the search
                        # goes on from the entity's end whatever the verdict, so the reading
                        # without the shared group is judged too. Searching on from the
                        # entity's end only left "555 2671" in clear (issue 5).
                    span = check(data, group_start, group_end)
                    if span is not None and span[1] > span[0]:
                        sink.append((entity, span[0], span[1]))
                        if group_start < span[0] < end:
                            # SECURITY: the check kept the end of a match that ran over two
                            # entities ("+14155550132/415-555-0199"): what comes before the
                            # accepted span is searched on its own, or it is never masked
                            # (found by security_tests/fuzz). Strictly shorter than the
                            # window searched (a check may also read on past a candidate's
                            # end, never past a window's), so this ends.
                            windows.append((match_start, span[0], sink, None))
                        if entity == PHONE and span[1] < group_end:
                            # SECURITY: the reading ends inside the candidate and may hold only the
                            # first group of the next phone: "dob 01/02/1990 415-555-0132" reads
                            # "01/02/1990 415" (a trunk-0 number) and the search went on after
                            # "415", leaving "555-0132" in clear (issue 5). The candidate is also
                            # searched from the reading's second group on, so a reading that
                            # shares its groups is judged too. What that search accepts is set
                            # aside (``extra``) and kept only if it masks a digit nothing else
                            # does and passes without a keyword ("Call 415-555-0132 24 hours"
                            # is no "555-0132 24"): the search below and the later rules run as
                            # before, so this only adds. It runs after the search of this window,
                            # and only if a digit the reading left of its candidate is still in
                            # clear (the next reading usually masks them). Strictly shorter than
                            # the window, so it ends; to the match's end, as the boundary after
                            # the group is part of a match.
                            second = _after_first_group(data, span[0], span[1])
                            if second < span[1] and phone_strong_within(data[second:group_end]):
                                windows.append((second, spans[0][1], extra, (span[1], group_end)))
                        # Resume after the accepted span; a check only narrows a match of a
                        # bounded pattern (or reads on a bounded way), so at most a pattern's
                        # length is scanned again.
                        resume = span[1] if inside is None else inside
                        position = resume if resume > match_start else match_start + 1
                    elif inside is not None:
                        position = inside if inside > match_start else match_start + 1
                    else:
                        # Resume at the end of the entity group, not of the match: a boundary
                        # character the match consumed may start the next entity.
                        position = group_end if group_end > match_start else match_start + 1
                        if entity == PHONE and stronger is not None:
                            # SECURITY: or at the end of a stronger entity the refused candidate
                            # ran through: a candidate holds eight groups at most, and one cut
                            # inside the phone after the entity ("4829 4399 9469 5674 4627 409
                            # 1-796-933-1914", a card inside) left that phone in clear (issue 5).
                            through = stronger.end_within(group_start, group_end)
                            if through is not None:
                                position = through if through > match_start else match_start + 1
            if len(accepted) > before:
                # Only this rule's spans are new: a few are added to the intervals in place
                # (the next rule takes ``covered`` afresh), not every accepted span sorted
                # again; many (number-dense text) are merged with the intervals in one sort.
                if len(accepted) - before > _FEW_SPANS:
                    covered = _Covered.union([*(covered.spans() if covered is not None else ()),
                                              *((a[1], a[2]) for a in accepted[before:])])
                else:
                    if covered is None:
                        covered = _Covered([])
                    for _, start, end in accepted[before:]:
                        covered.add(start, end)
        if extra:
            accepted += _unmasked_digits(data, accepted, extra)
        if not accepted:
            return []
        if size != len(normalized.text):
            to_char = _char_offsets(data, accepted)
            accepted = [(entity, to_char[start], to_char[end]) for entity, start, end in accepted]
        if normalized.identity:
            return accepted
        to_original = normalized.to_original
        return [(entity, *to_original(start, end)) for entity, start, end in accepted]

    def _last_literal(self, index: int, data: bytes, views: dict[bytes | None, bytes]) -> int:
        """Where the last of rule ``index``'s required literals starts in ``data`` (-1: none).

        Every match holds one (``Rule.required``), so none starts after it: the last
        search of a rule, which can only fail past it, is not made.
        """
        rule = self._rules[index]
        view = views.get(rule.view)
        if view is None:
            view = views[rule.view] = data.translate(rule.view)
        last = -1
        for literal in rule.required:
            found = view.rfind(literal)
            for _ in range(rule.required_times - 1):
                if found < 0:
                    break
                found = view.rfind(literal, 0, found)  # the occurrence before it
            if found > last:
                last = found
        return last

    # --- masking ----------------------------------------------------------------------

    def mask(self, text: str, operators: Mapping[str, Operator]) -> tuple[str, dict[str, int]]:
        """``text`` with every detection replaced by its entity's operator, and counts per type.

        An entity type without an operator gets the type tag (fail safe, never the value).
        """
        found = self._spans(text)
        if not found:
            return text, {}
        # What ``render`` does with whole (not partial) pieces, on the merged tuples as they
        # are: a ``_Piece`` per detection cost a quarter of the rendering (NamedTuple's
        # ``__new__`` is Python code).
        counts: dict[str, int] = {}
        out: list[str] = []
        position = 0
        for entity, start, end in _merge_spans(found):
            counts[entity] = counts.get(entity, 0) + 1
            out.append(text[position:start])
            out.append(operators.get(entity, _FALLBACK).apply(entity, text[start:end], partial=False))
            position = end
        out.append(text[position:])
        return "".join(out), counts

    def mask_many(self, texts: Sequence[str], operators: Mapping[str, Operator], *,
                  joins: Sequence[str] = DEFAULT_JOINS) -> tuple[list[str], dict[str, int]]:
        """Mask the elements of one tensor, including entities split across elements.

        Three scans when there are several elements: elements kept apart (what each one
        says alone), then joined with each of ``joins`` (what a model that concatenates
        them would say). A joined-only entity is masked in every element that contributes
        to it, each piece fully (``partial``), and counted once.
        """
        if len(texts) <= 1 or not self._rules:
            results = [self.mask(text, operators) for text in texts]
            counts: Counter[str] = Counter()
            for _, found in results:
                counts.update(found)
            return [masked for masked, _ in results], dict(counts)
        per_element: list[list[_Piece]] = [[] for _ in texts]
        counts = Counter()
        alone: list[dict[str, _Covered]] = []  # per element and type: what the element says alone
        for separator in (ELEMENT_BARRIER, *joins):
            # What earlier scans covered, per element: sorted, non-overlapping, so an
            # overlap test is one binary search.
            covered = [_Covered(_merge_pieces(pieces)) for pieces in per_element]
            joined = separator.join(texts)
            starts = _element_starts(texts, len(separator))
            readings = self._readings(joined)
            if not separator:
                readings += self._window_readings(texts, starts)
            for detection in merge(readings):
                kept = [detection]
                if alone and self._reads_on(detection, alone, texts, starts):
                    # An entity an element already holds whole, read on into its neighbour
                    # ("john@example.com" + "b..." = "...comb"): the neighbour is not part of it.
                    # SECURITY: the union may also hold another reading of its own (a glued
                    # phone after a card): each reading in it is judged alone, and one that
                    # does not merely read on is masked (found by the glued-entity generator).
                    kept = [r for r in readings if detection.start <= r.start and r.end <= detection.end
                            and not self._reads_on(r, alone, texts, starts)]
                counted = False
                for reading in kept:
                    pieces = _split(reading, texts, starts)
                    if not pieces:
                        continue  # only separator characters: nothing of an element
                    if not counted and not any(covered[i].overlaps(piece) for i, piece in pieces):
                        counts[detection.entity if reading is detection else reading.entity] += 1
                        counted = True
                    partial = len(pieces) > 1
                    for i, piece in pieces:
                        per_element[i].append(_Piece(piece[0], piece[1], reading.entity, partial))
            if not alone:
                alone = [_by_entity(pieces) for pieces in per_element]
        masked = [
            render(text, _merge_pieces(pieces), operators) if pieces else text
            for text, pieces in zip(texts, per_element, strict=True)
        ]
        return masked, dict(counts)

    @staticmethod
    def _reads_on(reading: Detection, alone: list[dict[str, _Covered]], texts: Sequence[str],
                  starts: list[int]) -> bool:
        """Whether an element already holds ``reading``'s entity, alone, where it lies.

        SECURITY: not when that entity ends the element on a joiner (``2001:db8::`` +
        ``ff00:42:8329``, ``203.0.`` + ``113.77``): it is open, the next element goes on with it.
        """
        pieces = _split(reading, texts, starts)
        last = pieces[-1][0] if pieces else -1
        return any(_same_entity(alone[i], reading.entity, piece)
                   and not (i != last and piece[1] == len(texts[i]) and texts[i][-1:] in _JOINERS)
                   for i, piece in pieces)

    def _window_readings(self, texts: Sequence[str], starts: list[int]) -> list[Detection]:
        """Readings across element boundaries in windows of 2 and 3 neighbouring elements,
        offsets into the elements joined with "".

        SECURITY: in the whole join an entity split across elements is glued to its
        neighbours ("x" + "203.0." + "113.77" + "7" reads "x203.0.113.777"), so the
        recognizers' boundaries refuse it; a window starts and ends where its elements do.
        Windows are scanned as one text (line breaks between them), and only the last and
        first ``_WINDOW_EDGE`` characters of the outer elements go in: linear in the input.
        """
        windows, positions, origins, cut = _windows(texts, starts)
        if not windows:
            return []
        text = ELEMENT_BARRIER.join(windows)
        out: list[Detection] = []
        for entity, start, end in self._spans(text):
            k = bisect.bisect_right(positions, start) - 1
            begin = positions[k]
            end = min(end, begin + len(windows[k]))
            if cut[k] and start == begin:
                continue  # starts where a long element was cut, not where its text does
            shift = origins[k] - begin
            out.append(Detection(entity, start + shift, end + shift))
        return [d for d in out if len(_split(d, texts, starts)) > 1]


# An entity that ends an element on one of these is not whole: the next element may go on.
_JOINERS: Final = frozenset(":.-@/_+")
# How much of a long element a window of neighbours takes: an entity split across
# elements is at most this long on either side of the boundary (PEM keys, split anywhere,
# are read in the whole join; their lines carry no boundary).
_WINDOW_EDGE: Final = 128


def _windows(texts: Sequence[str], starts: list[int]) -> tuple[list[str], list[int], list[int], list[bool]]:
    """Windows of 2 and 3 neighbouring elements: their texts, their offsets in the text
    :meth:`PiiEngine._window_readings` scans, in the "" join, and whether the first was cut."""
    windows: list[str] = []
    positions: list[int] = []
    origins: list[int] = []
    cut: list[bool] = []
    position = 0
    count = len(texts)
    for i in range(count - 1):
        first = texts[i]
        head = first[-_WINDOW_EDGE:]
        for j in (i + 1, i + 2):
            if j >= count or (j == i + 2 and len(texts[i + 1]) > _WINDOW_EDGE):
                break
            window = head + "".join(texts[i + 1:j]) + texts[j][:_WINDOW_EDGE]
            windows.append(window)
            positions.append(position)
            origins.append(starts[i] + len(first) - len(head))
            cut.append(len(head) < len(first))
            position += len(window) + len(ELEMENT_BARRIER)
    return windows, positions, origins, cut


# Rules whose patterns share one RE2 set. One set of every pattern builds DFA states for
# the product of all of them: on text it has not seen (a fresh process, new wording) the
# set alone cost ~300 µs/KB against ~10 µs/KB on text seen before, for hundreds of texts.
# Apart, the email local part, the secret key names and the rest meet far fewer
# combinations. Callgrind, a whole scan of the bench's 1 KB texts: first sight 3.97M ->
# 2.59M instructions per text; seen again 1.05M -> 1.09M (one more set to run).
_SET_GROUPS: Final = (frozenset({EMAIL}), frozenset({SECRET}))


# Rules scanned in the SECRET set rather than by entity: the keyword-led card reading
# (``card_grouped``) made the numeric set's DFA larger and every scan ~30% slower, and a
# set of its own costs one more pass (~8% on prose); among the keyword-led secret
# patterns it costs within noise (corpus +1%, number-dense +3%).
_WITH_SECRETS_RULES: Final = frozenset({"card_grouped"})


def _set_groups(rules: Sequence[Rule]) -> list[tuple[int, ...]]:
    """Rule indexes per RE2 set: one set per group of ``_SET_GROUPS`` (with the rules of
    ``_WITH_SECRETS_RULES`` in the SECRET one), one for the rest."""
    groups = [tuple(i for i, rule in enumerate(rules)
                    if (rule.entity in entities and rule.name not in _WITH_SECRETS_RULES)
                    or (rule.name in _WITH_SECRETS_RULES and SECRET in entities))
              for entities in _SET_GROUPS]
    grouped = {i for group in groups for i in group}
    return [*groups, tuple(i for i in range(len(rules)) if i not in grouped)]


_ALNUM: Final = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Up to this many new spans, a rule's finds are added to the covered intervals one by
# one; past it, merged with them in one sort (5,000 phones re-read by a glued rule: 20 ms
# one by one, 1 ms in one sort).
_FEW_SPANS: Final = 8
_NOT_DIGITS: Final = bytes(b for b in range(256) if not 0x30 <= b <= 0x39)
_TAIL: Final = 48


def _digits_end(data: bytes, views: dict[bytes | None, bytes] | None = None) -> int:
    """Where the last ASCII digit of ``data`` ends (0: none).

    The tail first: ``rstrip`` of the 246 other bytes looks each stripped byte up in
    that set, cheap over a few bytes but 3.5 µs over 600 bytes of prose; a ``translate``
    of the whole text (digits -> "0") and one reverse search cost 1.3 µs whatever the text.
    The translation is the shape view (``VIEW_SHAPE``: letters are "a", no other byte is
    "0"), kept in ``views``: the rules that declare literals of the shape read it too.
    """
    tail = data[-_TAIL:].rstrip(_NOT_DIGITS)
    if tail:
        return max(len(data) - _TAIL, 0) + len(tail)
    shape = views.get(VIEW_SHAPE) if views is not None else None
    if shape is None:
        shape = data.translate(VIEW_SHAPE)
        if views is not None:
            views[VIEW_SHAPE] = shape
    return shape.rfind(b"0") + 1


def _glued_cover(accepted: list[tuple[str, int, int]], entity: str) -> tuple[_Covered, _Covered]:
    """For a glued reading of ``entity``: what this type and stronger ones found (a
    candidate inside is skipped), and what stronger ones found (searched on after)."""
    rank = _RANK[entity]
    stronger: list[tuple[int, int]] = []
    same: list[tuple[int, int]] = []
    for found, start, end in accepted:
        found_rank = _RANK[found]
        if found_rank < rank:
            stronger.append((start, end))
        elif found_rank == rank:
            same.append((start, end))
    cover = _Covered.union(stronger)
    # Without a find of this type the two are the same intervals: built once, shared
    # (neither is changed while the rule runs; ``covered`` is what grows).
    return (_Covered.union(stronger + same) if same else cover), cover


def _read_after_entities(pattern: Pattern, rule: Rule, data: bytes,
                         accepted: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """The candidates of an ``after_entity`` rule: matched where an entity found so far
    ends (anchored there), and where one this rule accepts ends, each end once.

    Linear: one bounded match per entity end. Searching the whole text for the pattern
    instead matched inside every dashed or dotted number ("3582-9277-4112-6357") and cost
    a fifth of the scan of ordinary text.
    """
    found: list[tuple[str, int, int]] = []
    opens = rule.opens_with
    # Only the ends where the pattern can match are kept (the test below, made before the
    # heap is built): most entity ends are not glued on, and when none is, no heap, no set.
    ends = [end for end in {a[2] for a in accepted} if _glued_at(data, end, opens)]
    if not ends:
        return found
    heapq.heapify(ends)
    seen: set[int] = set()
    skip: _Covered | None = None
    while ends:
        position = heapq.heappop(ends)
        if position in seen:
            continue
        seen.add(position)
        if not _glued_at(data, position, opens):
            continue
        spans = pattern.spans_at(data, position, len(data))
        if spans[0][0] < 0:
            continue
        group_start, group_end = spans[rule.group] if rule.group >= 0 else next(
            (span for span in spans[1:] if span[0] >= 0), (-1, -1))
        if skip is None:
            skip = _glued_cover(accepted, rule.entity)[0]
        if group_start < 0 or skip.contains((group_start, group_end)):
            continue
        span = rule.check(data, group_start, group_end)
        if span is not None and span[1] > span[0]:
            found.append((rule.entity, span[0], span[1]))
            heapq.heappush(ends, span[1])
    return found


def _glued_at(data: bytes, position: int, opens: bytes | None) -> bool:
    """Whether an ``after_entity`` pattern can match at ``position``: a "-" or "." (what
    every such pattern opens with), then a byte its entity group can open with."""
    if data[position:position + 1] not in (b"-", b"."):
        return False
    return opens is None or (position + 1 < len(data) and data[position + 1] in opens)


def _unmasked_digits(data: bytes, accepted: list[tuple[str, int, int]],
                     extra: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """The readings of ``extra`` that hold a digit no reading of ``accepted`` covers and
    are phones without a keyword's help."""
    covered = _Covered.union([(r[1], r[2]) for r in accepted])  # once: O(n log n), not per reading
    return [reading for reading in extra
            if _uncovered_digit(data, covered, reading[1], reading[2]) and phone_strong(data[reading[1]:reading[2]])]


def _uncovered_digit(data: bytes, covered: _Covered | _Coverage, start: int, end: int) -> bool:
    """Whether ``data[start:end]`` holds a digit that ``covered`` does not cover."""
    position = start
    while position < end:
        stop = covered.end_of(position)
        if stop is None:
            if 0x30 <= data[position] <= 0x39:
                return True
            position += 1
        else:
            position = stop
    return False


class _Coverage:
    """What a scan has masked so far, asked position by position while a rule still adds
    readings: the merged intervals of the earlier rules, and the readings of lists that
    grow (indexed as they come, in buckets by start).

    SECURITY: built to keep the scan linear. Asking the lists themselves (a union of every
    reading on each question) cost O(readings) per re-read window: 790 ms for 64 KiB of
    phones glued back to back, quadratic in the text (issue 5, PII-08).
    """

    __slots__ = ("_buckets", "_covered", "_indexed", "_lists", "_longest")

    _WIDTH: Final = 64  # bytes of text per bucket

    def __init__(self, covered: _Covered | None,
                 *sources: tuple[list[tuple[str, int, int]], int]) -> None:
        self._covered = covered
        self._lists = [readings for readings, _ in sources]
        self._indexed = [first for _, first in sources]  # how far each list is indexed
        self._buckets: dict[int, list[tuple[int, int]]] = {}
        self._longest = 0

    def _sync(self) -> None:
        for number, readings in enumerate(self._lists):
            if self._indexed[number] == len(readings):
                continue
            for _, start, end in readings[self._indexed[number]:]:
                self._buckets.setdefault(start // self._WIDTH, []).append((start, end))
                if end - start > self._longest:
                    self._longest = end - start
            self._indexed[number] = len(readings)

    def end_of(self, position: int) -> int | None:
        """The furthest end of what covers ``position``, or None."""
        self._sync()
        best = self._covered.end_of(position) if self._covered is not None else None
        for bucket in range((position - self._longest) // self._WIDTH, position // self._WIDTH + 1):
            for start, end in self._buckets.get(bucket, ()):
                if start <= position < end and (best is None or end > best):
                    best = end
        return best


def _after_first_group(data: bytes, start: int, end: int) -> int:
    """Where the first digit run at or after ``start`` ends (``end`` if none ends before)."""
    segment = data[start:end]
    digits = segment.lstrip(_NOT_DIGITS)
    return end - len(digits.lstrip(b"0123456789"))


def _last_word(data: bytes, start: int, end: int) -> int:
    """Where the run of ASCII letters and digits that ends at ``end`` starts (``end`` if
    ``data[end - 1]`` is none of them), looking back no further than ``start``."""
    segment = data[start:end]
    return end - (len(segment) - len(segment.rstrip(_ALNUM)))


def _char_offsets(data: bytes, spans: list[tuple[str, int, int]]) -> dict[int, int]:
    """UTF-8 byte offset -> character offset, for the offsets of ``spans`` only.

    The offsets in order, each piece between two of them decoded once: one linear pass
    in C over the text, however many offsets (a regular-expression scan for the
    multi-byte runs cost more than the whole rest of a 1 KB scan). Offsets are character
    boundaries (the patterns match whole UTF-8 characters, checks move spans by ASCII
    bytes only); one that was not would raise, failing the request closed rather than
    masking the wrong characters.
    """
    chars: dict[int, int] = {}
    position = count = 0
    for offset in sorted({offset for _, start, end in spans for offset in (start, end)}):
        count += len(data[position:offset].decode())  # UTF-8 (no codec looked up by name)
        chars[offset] = count
        position = offset
    return chars


def _merge_spans(spans: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """:func:`merge` on (entity, start, end) tuples."""
    if len(spans) > 1:
        spans = sorted(spans, key=_merge_order)
    merged: list[tuple[str, int, int]] = []
    for span in spans:
        if merged and span[1] < merged[-1][2]:
            last = merged[-1]
            entity = last[0] if _RANK[last[0]] <= _RANK[span[0]] else span[0]
            merged[-1] = (entity, last[1], max(last[2], span[2]))
        else:
            merged.append(span)
    return merged


def _merge_order(span: tuple[str, int, int]) -> tuple[int, int]:
    return span[1], -span[2]


def merge(detections: Iterable[Detection]) -> list[Detection]:
    """Union of overlapping detections, typed by priority; sorted by start."""
    ordered = sorted(detections, key=lambda d: (d.start, -d.end))
    merged: list[Detection] = []
    for detection in ordered:
        if merged and detection.start < merged[-1].end:
            last = merged[-1]
            entity = last.entity if _RANK[last.entity] <= _RANK[detection.entity] else detection.entity
            merged[-1] = Detection(entity, last.start, max(last.end, detection.end))
        else:
            merged.append(detection)
    return merged


def _merge_pieces(pieces: list[_Piece]) -> list[_Piece]:
    ordered = sorted(pieces, key=lambda p: (p.start, -p.end))
    merged: list[_Piece] = []
    for piece in ordered:
        if merged and piece.start < merged[-1].end:
            last = merged[-1]
            entity = last.entity if _RANK[last.entity] <= _RANK[piece.entity] else piece.entity
            merged[-1] = _Piece(last.start, max(last.end, piece.end), entity, last.partial or piece.partial)
        else:
            merged.append(piece)
    return merged


def render(text: str, pieces: Sequence[_Piece], operators: Mapping[str, Operator]) -> str:
    """Apply operators to sorted, non-overlapping pieces of ``text``."""
    out: list[str] = []
    position = 0
    for piece in pieces:
        out.append(text[position:piece.start])
        operator = operators.get(piece.entity, _FALLBACK)
        out.append(operator.apply(piece.entity, text[piece.start:piece.end], partial=piece.partial))
        position = piece.end
    out.append(text[position:])
    return "".join(out)


def _element_starts(texts: Sequence[str], separator_length: int) -> list[int]:
    starts: list[int] = []
    position = 0
    for text in texts:
        starts.append(position)
        position += len(text) + separator_length
    return starts


def _split(detection: Detection, texts: Sequence[str], starts: list[int]) -> list[tuple[int, tuple[int, int]]]:
    """The element-local pieces of a span of the joined text (separators dropped)."""
    pieces: list[tuple[int, tuple[int, int]]] = []
    index = max(0, bisect.bisect_right(starts, detection.start) - 1)
    while index < len(texts) and starts[index] < detection.end:
        begin = max(detection.start, starts[index]) - starts[index]
        stop = min(detection.end, starts[index] + len(texts[index])) - starts[index]
        if stop > begin:
            pieces.append((index, (begin, stop)))
        index += 1
    return pieces


def _by_entity(pieces: list[_Piece]) -> dict[str, _Covered]:
    grouped: dict[str, list[_Piece]] = {}
    for piece in pieces:
        grouped.setdefault(piece.entity, []).append(piece)
    return {entity: _Covered(_merge_pieces(group)) for entity, group in grouped.items()}


def _same_entity(alone: dict[str, _Covered], entity: str, span: tuple[int, int]) -> bool:
    """Whether ``span`` holds, whole, an ``entity`` the element says alone.

    SECURITY: whole, not merely overlapping: a joined reading that only touches a reading
    of the element's own (a weak one in number soup) is still masked; overlap alone let
    "208-57" + "3-4221/075_42" leave the phone split across the two in clear.
    """
    covered = alone.get(entity)
    return covered is not None and covered.holds_one_within(span)


class _Covered:
    """Sorted, non-overlapping intervals with an O(log n) overlap test."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, pieces: list[_Piece]) -> None:
        # (No comprehension over no pieces: each one is a function call in CPython 3.11,
        # and a scan builds its intervals empty, then adds to them.)
        self._starts = [p.start for p in pieces] if pieces else []
        self._ends = [p.end for p in pieces] if pieces else []

    @classmethod
    def union(cls, spans: list[tuple[int, int]]) -> _Covered:
        covered = cls([])
        starts, ends = covered._starts, covered._ends
        last = -1  # the end of the last interval (ends are never negative)
        for start, end in sorted(spans):
            if start < last:
                if end > last:
                    ends[-1] = last = end
            else:
                starts.append(start)
                ends.append(end)
                last = end
        return covered

    def add(self, start: int, end: int) -> None:
        """Add ``[start, end)``: what :meth:`union` of the intervals and the span gives.

        The intervals it overlaps (a shared character, not a shared end: union keeps
        touching intervals apart) become one; the others do not move, since they
        neither overlap nor touch-merge with the result.
        """
        starts, ends = self._starts, self._ends
        low = bisect.bisect_right(ends, start)  # the first interval ending after ``start``
        high = bisect.bisect_left(starts, end, low)  # the first starting at or after ``end``
        if low < high:
            start = min(start, starts[low])
            end = max(end, ends[high - 1])
        starts[low:high] = [start]
        ends[low:high] = [end]

    def spans(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def overlaps(self, span: tuple[int, int]) -> bool:
        index = bisect.bisect_left(self._starts, span[1]) - 1
        return index >= 0 and self._ends[index] > span[0]

    def end_within(self, start: int, end: int) -> int | None:
        """The end of the first interval that starts after ``start`` and ends before ``end``."""
        index = bisect.bisect_right(self._starts, start)
        return self._ends[index] if index < len(self._starts) and self._ends[index] < end else None

    def end_of(self, position: int) -> int | None:
        """The end of the interval holding ``position``, or None."""
        index = bisect.bisect_right(self._starts, position) - 1
        return self._ends[index] if index >= 0 and self._ends[index] > position else None

    def holds_one_within(self, span: tuple[int, int]) -> bool:
        """Whether one of the intervals lies wholly inside ``span``."""
        index = bisect.bisect_left(self._starts, span[0])
        return index < len(self._starts) and self._ends[index] <= span[1]

    def contains(self, span: tuple[int, int]) -> bool:
        index = bisect.bisect_right(self._starts, span[0]) - 1
        return index >= 0 and self._ends[index] >= span[1]
