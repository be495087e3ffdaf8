"""Built-in keyword categories for semantic feature subspaces (Lan et al. 2024).

A feature belongs to a category when its top token (lower-cased, stripped of whitespace and
word-boundary markers) is one of the category's keywords. Keywords are single lower-case words;
common inflections are listed explicitly because tokens are matched exactly, not by prefix.
"""

from __future__ import annotations

_MONTHS = (
    "january february march april may june july august september october november december "
    "jan feb mar apr jun jul aug sep sept oct nov dec"
)
_WEEKDAYS = (
    "monday tuesday wednesday thursday friday saturday sunday mon tue tues wed thu thur thurs fri sat sun"
)

BUILTIN_CATEGORIES: dict[str, tuple[str, ...]] = {
    "Time": tuple(
        (
            "time times second seconds minute minutes hour hours day days week weeks month months year "
            "years decade decades century centuries moment moments today tomorrow yesterday tonight "
            "morning afternoon evening night nights noon midnight dawn dusk now then later soon early late "
            "before after during while until since ago past present future recently already always never "
            "often sometimes daily weekly monthly yearly annual annually period era age"
        ).split()
    ),
    "Calendar": tuple(
        (
            "calendar date dates schedule schedules holiday holidays weekend weekends weekday weekdays "
            "season seasons spring summer autumn fall winter christmas easter birthday anniversary "
            "deadline appointment agenda quarter semester term " + _WEEKDAYS
        ).split()
    ),
    "People/Roles": tuple(
        (
            "person people man men woman women child children boy boys girl girls mother father mom dad "
            "parent parents brother sister son daughter wife husband friend friends family teacher "
            "teachers student students doctor doctors nurse nurses lawyer engineer scientist author writer "
            "president king queen prince princess leader manager worker workers employee employees boss "
            "customer customers player players officer soldier soldiers farmer artist actor actress "
            "chef driver pilot judge professor citizen citizens neighbor neighbour baby babies"
        ).split()
    ),
    "Nature": tuple(
        (
            "nature tree trees forest forests river rivers lake lakes sea seas ocean oceans mountain "
            "mountains hill hills valley desert island islands beach flower flowers plant plants grass "
            "leaf leaves rock rocks stone stones sky sun moon star stars rain snow wind storm cloud clouds "
            "weather earth soil water fire ice wood woods field fields garden animal animals bird birds "
            "fish wildlife"
        ).split()
    ),
    "Emotions": tuple(
        (
            "emotion emotions feeling feelings happy happiness sad sadness angry anger fear afraid scared "
            "joy joyful love hate hatred anxious anxiety calm excited excitement surprise surprised "
            "disgust disgusted proud pride shame ashamed guilt guilty lonely loneliness hope hopeful "
            "worried worry nervous grateful jealous jealousy frustrated frustration upset glad delighted "
            "depressed depression cheerful miserable furious"
        ).split()
    ),
    "Month names": tuple(_MONTHS.split()),
    "Countries": tuple(
        (
            "country countries nation nations america usa us uk britain england scotland wales ireland "
            "france germany italy spain portugal netherlands belgium switzerland austria sweden norway "
            "denmark finland poland russia ukraine greece turkey egypt israel iran iraq india pakistan "
            "china japan korea vietnam thailand indonesia philippines australia zealand canada mexico "
            "brazil argentina chile peru colombia nigeria kenya ethiopia africa europe asia french german "
            "italian spanish chinese japanese russian indian american british canadian mexican brazilian"
        ).split()
    ),
    "Biology": tuple(
        (
            "biology cell cells gene genes genetic dna rna protein proteins enzyme enzymes molecule "
            "molecules organism organisms species evolution bacteria virus viruses tissue tissues organ "
            "organs blood brain heart lung lungs liver kidney muscle muscles bone bones neuron neurons "
            "membrane chromosome chromosomes mutation immune hormone hormones metabolism photosynthesis "
            "plant plants animal animals body"
        ).split()
    ),
}


def normalize_token_text(text: str) -> str:
    """Lower-case a decoded token and strip whitespace and BPE/SentencePiece word-boundary markers."""
    return text.replace("\u0120", " ").replace("\u2581", " ").replace("\u010a", "\n").strip().lower()
